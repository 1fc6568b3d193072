#!/usr/bin/env bash
# scripts/test.sh: THE test command. Sets up everything the suite needs, then
# runs pytest with the arguments given (passed through unchanged).
#
#   scripts/test.sh                      # default suite
#   scripts/test.sh tests/infra -q       # a part of it
#   scripts/test.sh -m "not slurm"       # any pytest arguments
#   DCSLURM_TEST_ALL=1 scripts/test.sh   # everything, slow and apptainer too
#
# Which tests run by default: every test except those marked `slow` or
# `apptainer`, which are reported as skipped. They run when
#   * DCSLURM_TEST_ALL=1, or `--run-all`;
#   * `--runslow` (slow ones) / `--run-apptainer` (apptainer ones);
#   * `-m EXPR` names the marker (`-m slow`, `-m "slow or apptainer"`,
#     `-m "not slow"`): then the -m expression alone decides for that marker.
# (The policy lives in tests/conftest.py, so plain `pytest` behaves the same.)
#
# Setup (each step skipped when already done, so a rerun starts in seconds):
#   1. Debian packages (APT_PACKAGES below) via apt-get, as root; checked
#      with dpkg first. Services are not started by the install: the tests
#      start private daemons of their own.
#   2. .venv with python3.11, then `pip install torch==2.14.1
#      torchvision==0.29.1` and `pip install -e '.[jobs,test]'`; redone
#      only when pyproject.toml or the torch pins change (stamp in .venv).
#
# Environment:
#   DCSLURM_TEST_ALL=1     run slow and apptainer tests too
#   DCSLURM_SKIP_SETUP=1   skip steps 1-2 (just run pytest in .venv)
#   DCSLURM_KEEP_TMP=1     keep daemon folders/logs under /tmp/dcslurm-test
#   DCSLURM_TEST_TMP=DIR   put them in DIR instead (keep the path short)
set -euo pipefail

# ---------------------------------------------------------------------------
# Debian packages the suite needs. ADD NEW PACKAGES HERE (one list, installed
# with --no-install-recommends).
APT_PACKAGES=(
  # python for .venv
  python3.11 python3.11-venv
  # SLURM cluster of emulated nodes (tests/infra/slurm_cluster.py)
  slurmctld slurmd slurm-client munge
  # accounting for the slurm_cluster_acct fixture (sacct)
  slurmdbd mariadb-server
  # offline data for the stages' tests
  wordnet-base dataset-fashion-mnist
  # Apptainer root (scripts/apptainer-host.sh)
  debootstrap
  # inductor (torch.compile) on the CPU: tests/test_train_precision.py
  g++
)
# ---------------------------------------------------------------------------

TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"

log() { echo "[test.sh] $*" >&2; }

install_apt_packages() {
  local missing=() p
  for p in "${APT_PACKAGES[@]}"; do
    if [[ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" != "installed" ]]; then
      missing+=("$p")
    fi
  done
  if ((${#missing[@]} == 0)); then
    return
  fi
  if [[ $(id -u) -ne 0 ]]; then
    log "missing Debian packages: ${missing[*]}; run this script as root"
    exit 1
  fi
  log "installing Debian packages: ${missing[*]}"
  # Keep package scripts from starting system daemons (munged, slurmd,
  # mariadb): the tests run private ones, and on a machine without a
  # policy a failing service start would abort the install.
  local policy=/usr/sbin/policy-rc.d added_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    added_policy=1
  fi
  local rc=0
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}" || rc=$?
  if ((added_policy)); then rm -f "$policy"; fi
  if ((rc != 0)); then
    log "apt-get failed ($rc)"
    exit "$rc"
  fi
}

setup_venv() {
  if [[ ! -x $VENV/bin/python ]]; then
    local py
    py="$(command -v python3.11 || true)"
    if [[ -z $py ]]; then
      log "python3.11 not found"
      exit 1
    fi
    log "creating $VENV with $py"
    "$py" -m venv "$VENV"
  fi
  # Reinstall only when what decides the environment changed.
  local stamp_file="$VENV/.dcslurm-setup-stamp" stamp
  stamp="$({ cat pyproject.toml; echo "${TORCH_PINS[*]}"; } | sha256sum | cut -d' ' -f1)"
  if [[ -f $stamp_file && "$(cat "$stamp_file")" == "$stamp" ]] &&
    "$VENV/bin/python" -c 'import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ("dcslurm", "torch", "torchvision", "pytest", "s3fs")))'; then
    return
  fi
  local pip=("$VENV/bin/python" -m pip --disable-pip-version-check install --progress-bar off)
  log "pip install ${TORCH_PINS[*]}"
  "${pip[@]}" "${TORCH_PINS[@]}"
  log "pip install -e .[jobs,test]"
  "${pip[@]}" -e ".[jobs,test]"
  echo "$stamp" >"$stamp_file"
}

if [[ ${DCSLURM_SKIP_SETUP:-0} != 1 ]]; then
  t0=$SECONDS
  install_apt_packages
  setup_venv
  log "setup done in $((SECONDS - t0)) s"
fi

export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
exec "$VENV/bin/python" -m pytest "$@"
