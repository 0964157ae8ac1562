#!/usr/bin/env bash
# Set up a fresh machine for slurmexecutor: Slurm + munge and FUSE 3 (Debian packages, when
# we are root and they are missing) and the package itself with its extras. FUSE is for
# scripts/lagfs.py, the lagging shared-folder view of a test cluster's login node.
#   bash scripts/bootstrap.sh          # library + pysam (for the demo / count-reads)
#   bash scripts/bootstrap.sh test     # ... + test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
extras="bio"
[ "${1:-}" = "test" ] && extras="bio,test"
if ! command -v sbatch >/dev/null 2>&1 || [ ! -x /usr/sbin/slurmctld ] || [ ! -x /usr/sbin/munged ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt_updated=1
    apt-get install -y -qq slurm-wlm munge >/dev/null
  else
    echo "bootstrap: Slurm is not installed and we cannot apt-get it; the local backend will be used" >&2
  fi
fi
if ! command -v fusermount3 >/dev/null 2>&1 || ! { ldconfig -p 2>/dev/null | grep 'libfuse3\.so\.3' >/dev/null; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    [ -n "${apt_updated:-}" ] || apt-get update -qq
    apt-get install -y -qq fuse3 >/dev/null
  else
    echo "bootstrap: FUSE 3 is not installed and we cannot apt-get it; scripts/lagfs.py will not mount" >&2
  fi
fi
if [ "${1:-}" = "test" ] && ! command -v chromium >/dev/null 2>&1; then
  # tests/test_report.py opens the report in headless Chromium
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    [ -n "${apt_updated:-}" ] || apt-get update -qq
    apt-get install -y -qq chromium >/dev/null
  else
    echo "bootstrap: chromium is not installed and we cannot apt-get it; tests/test_report.py will fail" >&2
  fi
fi
python3 -m pip install -q -e ".[${extras}]"
