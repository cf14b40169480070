"""A distributed flood's defences deployed in the lab: `kokoa under-attack on` edits the stack file,
`kokoa lab up` deploys it, the edge challenges a request without a pass, headless Chromium passes
the challenge and sees the application, and `kokoa health` keeps probing through (its token)."""

from __future__ import annotations

import copy
import json
import shutil

from click.testing import CliRunner

from kokoa_infra.cli import main as kokoa
from kokoa_infra.lab.deploy import load_stack
from tests.lab.test_health_lab import run_health
from tests.support.html_preview import chromium_binary, run_chromium

SITE = "shop"


def get(lab, domain: str, address: str) -> tuple[str, str]:
    """(status code, body) of one verified HTTPS request from the client namespace."""
    proc = lab.on_host(lab.status["client"], "curl", "-sS", "--max-time", "10", "--cacert", lab.status["caBundle"],
                       "--resolve", f"{domain}:443:{address}", "-w", "\n%{http_code}", f"https://{domain}/")
    body, _, code = proc.stdout.rpartition("\n")
    return code, body


def test_under_attack_on_challenges_newcomers_lets_browsers_through_and_keeps_health_probing(lab, tmp_path):
    stack = tmp_path / "Pulumi.lab.yaml"
    shutil.copy(lab.stack_file, stack)
    edited = CliRunner().invoke(kokoa, ["under-attack", "--file", str(stack), "on", SITE], catch_exceptions=False)
    assert edited.exit_code == 0, edited.output
    before = copy.deepcopy(lab.config()["kokoa:origins"])
    origins = copy.deepcopy(before)
    next(o for o in origins if o["name"] == SITE)["underAttack"] = \
        next(o for o in load_stack(stack)["kokoa:origins"] if o["name"] == SITE)["underAttack"]
    origin = next(o for o in lab.status["origins"] if o["name"] == SITE)
    edge = next(e for e in lab.status["edges"] if e["origin"] == SITE)
    try:
        lab.apply({"kokoa:origins": origins})
        code, body = get(lab, origin["domain"], edge["publicIp"])
        assert code == "503" and "var CHALLENGE = " in body
        if chromium_binary():
            browser = run_chromium(f"https://{origin['domain']}/", "--dump-dom", "--virtual-time-budget=20000",
                                   "--ignore-certificate-errors",
                                   f"--host-resolver-rules=MAP {origin['domain']} {edge['publicIp']}",
                                   netns=lab.status["client"])
            assert f"hello from origin {SITE}" in browser.stdout, browser.log[-2000:]
        # kokoa health, run on the other origin, probes shop's edge through to the application.
        blog = next(o for o in lab.status["origins"] if o["name"] != SITE)
        nodes = run_health(lab, blog)
        assert nodes[f"edge/{edge['name']}"]["checks"]["https"]["code"] == 200
        # Without the token (outputs read without secrets) the same probe meets the challenge.
        outputs = json.loads(lab.outputs_file.read_text())
        outputs["healthTokens"] = "[secret]"
        hidden = tmp_path / "outputs.json"
        hidden.write_text(json.dumps(outputs))
        nodes = run_health(lab, blog, "--outputs", str(hidden))
        assert nodes[f"edge/{edge['name']}"]["checks"]["https"]["code"] == 503
    finally:
        lab.apply({"kokoa:origins": before})
    code, body = get(lab, origin["domain"], edge["publicIp"])
    assert (code, body.strip()) == ("200", f"hello from origin {SITE}")
