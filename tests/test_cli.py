"""`kom-gateway check` and `kom-gateway route`, in-process and as a real process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kom_gateway.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = str(ROOT / "config" / "example.yaml")
KUBELET_UA = "kubelet/v1.31.0 (linux/amd64) kubernetes/6911225"


def route(capsys, *args):
    assert main(["route", "--config", EXAMPLE, *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_check_prints_groups_and_rules(capsys):
    assert main(["check", "--no-files", EXAMPLE]) == 0
    out = capsys.readouterr().out
    assert "OK — 4 groups, 3 cut-over rules" in out
    assert "pod      endpoints: https://10.0.1.10:6443" in out
    assert "resources: pods, bindings" in out
    assert "events.events.k8s.io" in out
    assert "[1] userAgent=kubelet/* userGroup=system:nodes  ->  pod 25%, config 100%, event 100%" in out
    assert "event    in flight: 300 (queue: 15s), watches: no limit" in out
    assert ("protected (never shed from a certificate, 4 in flight per identity; 10% reserve): "
            "verbs=create,get,patch,update resources=leases.coordination.k8s.io; "
            "verbs=patch,update resources=nodes/status") in out
    assert "exempt (never shed): userGroup=system:masters" in out
    assert ("rate limit 'operator-lists': userAgent=my-operator/* verbs=list  ->  5 qps, "
            "burst 10, per client") in out


def test_check_reports_errors_and_exits_1(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups:\n  pod: {endpoints: [https://a], resources: [Pods]}\n")
    assert main(["check", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"{bad}: line 2: groups.pod.resources[0]: bad resource 'Pods'" in captured.err
    assert "a 'default' group is required" in captured.err
    assert "Traceback" not in captured.err


def test_check_prints_warnings(tmp_path, capsys):
    cfg = tmp_path / "w.yaml"
    cfg.write_text("groups:\n  default: {endpoints: [https://a]}\n  spare: {endpoints: [https://b]}\n")
    assert main(["check", str(cfg)]) == 0
    assert "warning: line 3: groups.spare: claims no resources" in capsys.readouterr().err


def test_route_explains_a_cut_over(capsys):
    result = route(
        capsys, "--user-agent", "kube-scheduler/v1.31.0", "--client", "x509:CN=system:kube-scheduler",
        "POST", "/api/v1/namespaces/ns/bindings",
    )
    assert result["request"]["verb"] == "create"
    assert result["request"]["resource"] == "bindings"
    assert (result["homeGroup"], result["chosenGroup"], result["reason"]) == ("pod", "pod", "cut-over")
    assert result["rule"]["index"] == 0
    assert result["rule"]["match"] == {"userAgent": "kube-scheduler/*"}
    assert result["client"]["key"] == "x509:CN=system:kube-scheduler|kube-scheduler"


def test_route_kubelet_percent_is_stable_and_explained(capsys):
    args = ["--user-agent", KUBELET_UA, "--group", "system:nodes"]
    results = [
        route(capsys, *args, "--client", f"x509:CN=system:node:n{i}", "GET",
              "https://gw:8443/api/v1/pods?fieldSelector=spec.nodeName%3Dn1&watch=true")
        for i in range(40)
    ]
    moved = [r for r in results if r["chosenGroup"] == "pod"]
    stayed = [r for r in results if r["chosenGroup"] == "default"]
    assert moved and stayed  # 25% of 40 clients
    for r in moved:
        assert r["client"]["bucket"] < 25 and r["reason"] == "cut-over"
    for r in stayed:
        assert r["client"]["bucket"] >= 25 and r["reason"] == "not-cut-over"
        assert "stays on default until the percent exceeds" in r["explanation"]
    assert results[0]["request"]["verb"] == "watch"
    assert results[0]["request"]["isLongRunning"] is True
    again = route(capsys, *args, "--client", "x509:CN=system:node:n0", "GET", "/api/v1/pods?watch=1")
    assert again["client"]["bucket"] == results[0]["client"]["bucket"]
    assert again["chosenGroup"] == results[0]["chosenGroup"]


def test_route_x509_client_implies_user_and_groups(capsys):
    result = route(
        capsys, "--user-agent", KUBELET_UA, "--client", "x509:CN=system:node:n7,O=system:nodes",
        "GET", "/api/v1/nodes/n7",
    )
    assert result["client"]["user"] == "system:node:n7"
    assert result["client"]["groups"] == ["system:nodes"]
    assert (result["chosenGroup"], result["rule"]["index"]) == ("config", 1)


def test_route_ip_client_and_unclaimed(capsys):
    result = route(capsys, "--client", "10.2.3.4", "GET", "/apis/apps/v1/deployments")
    assert result["client"]["key"] == "addr:10.2.3.4|"
    assert result["reason"] == "home-is-default"
    assert result["rule"] is None
    no_rule = route(capsys, "--user-agent", "kubectl/v1.31", "GET", "/api/v1/nodes")
    assert (no_rule["homeGroup"], no_rule["chosenGroup"], no_rule["reason"]) == (
        "config", "default", "no-cutover-rule")


def test_route_with_bad_config_exits_1(tmp_path, capsys):
    assert main(["route", "--config", str(tmp_path / "x.yaml"), "GET", "/"]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_console_script_runs_as_a_process():
    proc = subprocess.run(
        [sys.executable, "-m", "kom_gateway", "check", "--no-files", EXAMPLE],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK — 4 groups" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "kom_gateway", "route", "--config", EXAMPLE, "GET", "/api/v1/events"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert json.loads(proc.stdout)["homeGroup"] == "event"


def test_run_with_unusable_tls_files_exits_1_with_a_clear_error(tmp_path, capsys):
    cfg = tmp_path / "gw.yaml"
    cfg.write_text("listen: {address: '127.0.0.1:18999', tls: {certFile: missing.crt, keyFile: missing.key}}\n"
                   "groups: {default: {endpoints: ['http://127.0.0.1:1']}}\n")
    assert main(["run", "--config", str(cfg), "--admin", "127.0.0.1:0"]) == 1
    err = capsys.readouterr().err
    # every file named, with its YAML key, all at once
    assert f"listen.tls.certFile: {tmp_path}/missing.crt: no such file" in err
    assert f"listen.tls.keyFile: {tmp_path}/missing.key: no such file" in err
    assert "Traceback" not in err


def test_route_takes_back_the_key_the_access_log_prints(capsys):
    """`client` from an access-log line (or a route result) pasted into --client gives the
    same key, bucket and decision as the request had."""
    from kom_gateway.proxy.intake import _new_client

    data_plane = _new_client("10.0.0.9", None, b"kubelet/v1.31.0 (linux/amd64)",
                             b"Bearer demo-token")  # fmt: skip
    for args in (["--client", data_plane.key,  # the access log's `client` and `userAgent`
                  "--user-agent", "kubelet/v1.31.0 (linux/amd64)"],
                 ["--token", "demo-token", "--user-agent", "kubelet/v1.31.0 (linux/amd64)"],
                 ["--client", data_plane.key.split("|")[0], "--user-agent", "kubelet/v1.31"]):
        result = route(capsys, *args, "GET", "/api/v1/pods")
        assert result["client"]["key"] == data_plane.key, args
        assert result["client"]["bucket"] == round(data_plane.bucket, 4)
    x509 = route(capsys, "--client", "x509:CN=system:node:n7,O=system:nodes|kubelet",
                 "--user-agent", KUBELET_UA, "GET", "/api/v1/nodes/n7")  # fmt: skip
    assert x509["client"]["key"] == "x509:CN=system:node:n7,O=system:nodes|kubelet"
    assert x509["client"]["groups"] == ["system:nodes"]
    addr = route(capsys, "--client", "addr:10.2.3.4|curl", "--user-agent", "curl/8.1",
                 "GET", "/api/v1/nodes")  # fmt: skip
    assert addr["client"]["key"] == "addr:10.2.3.4|curl"


@pytest.mark.parametrize(("args", "says"), [
    (["--client", "token:demo-token"], "32-hex digest"),  # a raw token where a key goes
    (["--client", "bob"], "accepted: x509:"),
    (["--client", "addr:10.0.0.1|kubelet", "--user-agent", "kubectl/v1.31"], "give one"),
    (["--client", "x509:CN=a|kubectl", "--token", "t"], "two identities"),
    # the key names the program, the config's rules match whole User-Agents: no guess
    (["--client", "addr:10.0.0.1|kubelet"], "add --user-agent as the access log"),
])
def test_route_refuses_what_is_not_a_client_key(capsys, args, says):
    assert main(["route", "--config", EXAMPLE, *args, "GET", "/api/v1/pods"]) == 2
    assert says in capsys.readouterr().err


def test_check_opens_the_tls_files_and_names_each_problem(tmp_path, capsys, pki):
    """A wrong path, a key from another certificate and a CA that is not one are each
    named with their YAML key and file, all at once; the gateway would not start."""
    text = (
        'groups:\n  default: {endpoints: ["https://10.0.0.1:6443"]}\n'
        f"listen: {{tls: {{certFile: {pki.server_cert}, keyFile: {pki.kubelet_key}, "
        f"clientCAFile: {pki.tokens}}}}}\n"
        f"upstream: {{tls: {{caFile: {tmp_path}/missing-ca.crt}}}}\n"
    )
    config = tmp_path / "gw.yaml"
    config.write_text(text)
    assert main(["check", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"listen.tls: the key {pki.kubelet_key} does not belong to the certificate" in err
    assert f"listen.tls.clientCAFile: {pki.tokens}: not a PEM CA certificate" in err
    assert f"upstream.tls.caFile: {tmp_path}/missing-ca.crt: no such file" in err
    assert "add --no-files" in err  # a missing file: perhaps checked on another machine
    assert main(["check", "--no-files", str(config)]) == 0  # for another machine
    good = text.replace(str(pki.kubelet_key), str(pki.server_key)).replace(
        str(pki.tokens), str(pki.ca)).replace(f"{tmp_path}/missing-ca.crt", str(pki.ca))
    config.write_text(good)
    capsys.readouterr()
    assert main(["check", str(config)]) == 0
    # the test PKI's certificates live two days: check says so (a warning, still OK)
    assert f"warning: listen.tls.certFile: {pki.server_cert}: a certificate in it expires in" in (
        capsys.readouterr().err)


def test_a_reader_that_goes_away_gets_no_traceback():
    """`kom-gateway route ... | head -1`: the pipe's reader is gone before the output is
    written (here: closed before the process starts writing); the command stops quietly."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kom_gateway", "route", "--config", EXAMPLE, "GET", "/api/v1/pods"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader leaves at once
    _, stderr = proc.communicate(timeout=60)
    assert b"Traceback" not in stderr and b"BrokenPipeError" not in stderr, stderr.decode()
    assert proc.returncode == 1


def test_demo_help_says_what_the_demo_does(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "simulated apiserver groups" in out and "kubeconfig" in out
