# Kokoa Proxy: `make test` and `make lab` do all set-up on a fresh Debian 12 machine (as root).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
# What the tests and the lab run for real: WireGuard, nginx, sshd, ACME (pebble + certbot).
DEBIAN_PACKAGES := wireguard-tools wireguard-go nginx libnginx-mod-stream libnginx-mod-http-js shellcheck openssh-server openssh-client \
	certbot pebble iproute2 iputils-ping fping curl openssl util-linux wrk \
	systemd-container nftables chromium nghttp2-client logrotate mtail

.PHONY: setup system-packages venv test lab lab-down bench clean

setup: system-packages venv

# Debian's postinst scripts would start nginx and sshd in the root namespace; the tests
# and the lab run their own, per host. A policy-rc.d that says "no" keeps them stopped.
system-packages:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  [ "$$(id -u)" -eq 0 ] || { echo "run as root (apt-get and network namespaces need it)"; exit 1; }; \
	  guard=; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && guard=1; fi; \
	  apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing \
	    >/tmp/kokoa-apt.log 2>&1; status=$$?; \
	  [ -z "$$guard" ] || rm -f /usr/sbin/policy-rc.d; \
	  [ $$status -eq 0 ] || { tail -20 /tmp/kokoa-apt.log; exit 1; }; \
	fi

# The runtime pins (requirements.txt) and the test tools (requirements-test.txt includes
# requirements.txt), then this project, editable, with its console scripts.
$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements-test.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

test: setup
	$(VENV)/bin/python -m pytest -q

lab: setup
	$(VENV)/bin/kokoa lab up

lab-down: venv
	$(VENV)/bin/kokoa lab down

# The data plane per hop, against a bare reference and under floods (bench/results/dataplane.json),
# the distributed flood against an origin of limited capacity (bench/results/distributed.json),
# then the health sweep and the program's evaluation. Each prints ratios within its own run.
bench: setup
	$(VENV)/bin/python bench/dataplane.py
	$(VENV)/bin/python bench/distributed.py
	$(VENV)/bin/python bench/challenge_cost.py
	$(VENV)/bin/python bench/health_sweep.py
	$(VENV)/bin/python bench/program_eval.py

# docs/status-page.png: the sample status page in headless Chromium (in a loopback-only namespace).
.PHONY: status-page
status-page: setup
	$(VENV)/bin/python docs/status_page_screenshot.py docs/status-page.png

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
