"""The Kubernetes recipe (deploy/kubernetes): every manifest valid against the
Kubernetes OpenAPI schema in strict mode, the validator sharp enough to fail a
misspelt field, and the figures that must agree with the server's flags."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml
from conftest import ROOT, VENV_BIN

DEPLOY = ROOT / "deploy/kubernetes"


def validate(*paths):
    return subprocess.run(
        [str(Path(VENV_BIN) / "kubernetes-validate"), "--strict", "-k", "1.37.0", *map(str, paths)],
        capture_output=True, text=True, timeout=120,
    )


def test_manifests_are_valid_in_strict_mode():
    manifests = sorted(DEPLOY.glob("*.yaml"))
    assert {m.name for m in manifests} >= {"deployment.yaml", "service.yaml", "pdb.yaml", "session-store.yaml"}
    out = validate(*manifests)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("passed") == 6, out.stdout


def test_the_validator_fails_a_misspelt_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((DEPLOY / "deployment.yaml").read_text().replace("readinessProbe:", "readinesProbe:"))
    out = validate(bad)
    assert out.returncode != 0, out.stdout


def test_grace_period_and_memory_match_the_flags():
    deployment = yaml.safe_load((DEPLOY / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    args = dict(a.split("=", 1) for a in pod["containers"][0]["args"] if "=" in a)
    drain = float(args["--drain-seconds"])
    close_grace = 3  # src/server/drain.rs CLOSE_GRACE
    assert pod["terminationGracePeriodSeconds"] > drain + close_grace
    budget_gib = float(re.fullmatch(r"(\d+)GiB", args["--max-kv-bytes"]).group(1))
    request_gib = float(re.fullmatch(r"(\d+)Gi", pod["containers"][0]["resources"]["requests"]["memory"]).group(1))
    # BENCHMARKS.md: ~1.5 GB RSS once the f32 model is loaded.
    assert request_gib >= budget_gib + 1.5
    probes = {k: pod["containers"][0][k]["grpc"]["port"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert set(probes.values()) == {int(args["--addr"].rsplit(":", 1)[1])}


def test_the_replicas_and_the_session_store_agree():
    """The server's --session-store names the store's Service and port, its
    password file is the key the store's password comes from (one Secret),
    and the store keeps an append-only file on a volume."""
    deployment = yaml.safe_load((DEPLOY / "deployment.yaml").read_text())
    store_set, store_service = yaml.safe_load_all((DEPLOY / "session-store.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    server = pod["containers"][0]
    args = dict(a.split("=", 1) for a in server["args"] if "=" in a)
    url = re.fullmatch(r"redis://([a-z0-9-]+):(\d+)", args["--session-store"])
    assert url, args["--session-store"]
    assert url.group(1) == store_service["metadata"]["name"]
    assert int(url.group(2)) == store_service["spec"]["ports"][0]["port"]
    password_file = Path(args["--session-store-password-file"])
    mount = next(m for m in server["volumeMounts"] if m["mountPath"] == str(password_file.parent))
    secret = next(v["secret"]["secretName"] for v in pod["volumes"] if v["name"] == mount["name"])
    valkey = store_set["spec"]["template"]["spec"]["containers"][0]
    ref = next(e["valueFrom"]["secretKeyRef"] for e in valkey["env"] if e["name"] == "VALKEY_PASSWORD")
    assert (ref["name"], ref["key"]) == (secret, password_file.name)
    assert "$(VALKEY_PASSWORD)" in valkey["args"]
    flags = valkey["args"]
    assert flags[flags.index("--appendonly") + 1] == "yes"
    assert flags[flags.index("--dir") + 1] == valkey["volumeMounts"][0]["mountPath"]
