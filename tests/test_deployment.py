"""The deployment files: the compose file parses and names every service; .env.example and the code agree."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import ROOT

SOURCES = ["shared", "worker", "bots", "training"]
NOT_OURS = {"REDIS_PASSWORD", "HF_TOKEN"}  # compose's own variable, and huggingface_hub's


def code_settings() -> set[str]:
    names = set()
    for folder in SOURCES:
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(re.findall(r'"((?:SHALLOW|TELEGRAM|DISCORD)_[A-Z0-9_]+|REDIS_URL)"', path.read_text()))
    return names


def example_settings() -> set[str]:
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.MULTILINE))


def test_every_setting_in_env_example_is_read_and_every_read_setting_is_in_it():
    code, example = code_settings(), example_settings()
    assert code - example == set(), "settings the code reads that .env.example does not name"
    assert example - code - NOT_OURS == set(), "names in .env.example that nothing reads"
    compose_vars = set(re.findall(r"\$\{([A-Z][A-Z0-9_]+)", (ROOT / "docker-compose.yml").read_text()))
    assert compose_vars - example == set(), "variables docker-compose.yml uses that .env.example does not name"


def test_the_compose_file_names_every_service_and_keeps_redis_private():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "worker", "discord", "telegram", "web", "rq-dashboard"}
    redis = services["redis"]
    assert "ports" not in redis and "--requirepass" in redis["command"] and "--appendonly" in redis["command"]
    assert "healthcheck" in redis and any("redis-data" in v for v in redis["volumes"])
    worker = services["worker"]
    assert worker["build"]["dockerfile"] == "Dockerfile.worker"
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert any("model-cache" in v for v in worker["volumes"])
    for bot in ("discord", "telegram"):
        assert services[bot]["build"]["dockerfile"] == "Dockerfile.bots" and services[bot]["command"] == [bot]
    assert services["rq-dashboard"]["ports"] == ["127.0.0.1:9181:9181"]  # never on a public interface
    web = services["web"]
    assert web["build"]["dockerfile"] == "Dockerfile.bots" and web["command"][0] == "web"
    assert web["ports"] == ["127.0.0.1:${SHALLOW_WEB_PORT:-7860}:7860"] and web["profiles"] == ["web"]
    for name in ("Dockerfile.worker", "Dockerfile.bots"):
        assert (ROOT / name).is_file()
    assert "torch" not in (ROOT / "Dockerfile.bots").read_text().split("RUN", 1)[1].replace("no torch", "")


def _compose_client() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.skipif(not _compose_client(), reason="no docker compose client here (the YAML test above checks the file)")
def test_docker_compose_config_accepts_the_file(tmp_path):
    env = tmp_path / ".env"
    env.write_text("REDIS_PASSWORD=x\nDISCORD_BOT_TOKEN=x\nTELEGRAM_BOT_TOKEN=x\n")
    proc = subprocess.run(["docker", "compose", "--env-file", str(env), "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
