"""The alert rules and the Prometheus config in deploy/prometheus/, checked by promtool: the
rules parse, and each alert fires on what should raise it, after its `for`, and on nothing
else (deploy/prometheus/alerts.test.yml)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.kit import ROOT

PROMTOOL = shutil.which("promtool")
FOLDER = ROOT / "deploy" / "prometheus"

pytestmark = pytest.mark.skipif(not PROMTOOL, reason="needs promtool (./dev test installs it)")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL
    return subprocess.run(
        [PROMTOOL, *args], cwd=FOLDER, capture_output=True, text=True, check=False, timeout=120
    )


def test_rules_and_config_pass_promtool_check() -> None:
    rules = promtool("check", "rules", "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


def test_rules_pass_their_unit_tests() -> None:
    done = promtool("test", "rules", "alerts.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_required_alerts_exist_and_each_is_tested() -> None:
    rules = yaml.safe_load((FOLDER / "alerts.yml").read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    tests = yaml.safe_load((FOLDER / "alerts.test.yml").read_text())
    tested = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]}
    assert tested == set(alerts)
    wanted = {
        "kafka_consumergroup_group_max_lag_seconds": "PredictionStreamLagHigh",
        "stream_consumer_lag_status": "PredictionStreamPartitionStalled",
        "stream_breaker_state": "PredictionStreamBreakerOpen",
        "stream_spend_limited": "PredictionStreamSpendLimited",
        'stream_records_total{outcome="dead_letter"}': "PredictionStreamDeadLetterRate",
    }
    for metric, alert in wanted.items():
        assert metric in alerts[alert]["expr"], alert
        assert alerts[alert]["annotations"]["summary"] and alerts[alert]["for"]
