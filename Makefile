# Kokoa Proxy: `make test` and `make lab` do all set-up on a fresh Debian 12 machine (as root).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
# Debian 12's own Python (3.11.2; python3-venv gives it venv and ensurepip): CI also runs the unit tier with it.
DEBIAN_PYTHON := /usr/bin/python3
DEBIAN_VENV := .venv-debian
# Which interpreter a virtualenv was made from (its version and base prefix): another PYTHON makes it again.
PYTHON_ID = import sys; print(sys.version.split()[0], sys.base_prefix)
# What the tests and the lab run for real: WireGuard, nginx, sshd, ACME (pebble + certbot).
DEBIAN_PACKAGES := wireguard-tools wireguard-go nginx libnginx-mod-stream libnginx-mod-http-js shellcheck openssh-server openssh-client \
	certbot pebble iproute2 iputils-ping fping curl openssl util-linux wrk \
	systemd-container nftables chromium nghttp2-client logrotate mtail python3-venv

.PHONY: setup system-packages venv lint test test-debian-python lab lab-down bench clean

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

venv:
	@if [ -x $(VENV)/bin/python ] && [ "$$($(VENV)/bin/python -c '$(PYTHON_ID)')" != "$$($(PYTHON) -c '$(PYTHON_ID)')" ]; then \
	  echo "$(VENV) was made from another Python than $(PYTHON): making it again"; rm -rf $(VENV); fi
	@$(MAKE) --no-print-directory $(VENV)/.installed

# The linter first (ruff: pyflakes, pycodestyle, isort; configured in pyproject.toml), then every tier.
lint: venv
	$(VENV)/bin/ruff check .

test: setup lint
	$(VENV)/bin/python -m pytest -q

# The unit tier on Debian 12's own Python, in a virtualenv of its own (.ci/run runs it after `make test`).
test-debian-python: system-packages
	@$(MAKE) --no-print-directory venv VENV=$(DEBIAN_VENV) PYTHON=$(DEBIAN_PYTHON)
	$(DEBIAN_VENV)/bin/python -m pytest -q tests/unit

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
	rm -rf $(VENV) $(DEBIAN_VENV) .pytest_cache build *.egg-info
