#!/usr/bin/env bash
# Set up a fresh machine for slurmexecutor: Slurm + munge (Debian packages, when we are
# root and they are missing) and the package itself with its extras.
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
    apt-get install -y -qq slurm-wlm munge >/dev/null
  else
    echo "bootstrap: Slurm is not installed and we cannot apt-get it; the local backend will be used" >&2
  fi
fi
python3 -m pip install -q -e ".[${extras}]"
