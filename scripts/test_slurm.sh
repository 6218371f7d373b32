#!/usr/bin/env bash
# A goemo sweep as a real Slurm job array on a one-node cluster started here: installs
# slurm-wlm and munge from Debian when missing (needs root), starts munged, slurmctld and slurmd
# on localhost with state under a temporary folder, submits deploy/slurm/sweep.sbatch as
# `sbatch --array=0-3 --wait` over a 4-member sweep of cheap command stages, checks that every
# member is recorded once and the shared upstream stage ran once, that a shared cache (a
# folder remote) lets another folder list all four members, and stops the daemons whatever
# happens.
#
#   scripts/test_slurm.sh [path/to/goemo]
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
goemo="$(realpath "${1:-${CARGO_TARGET_DIR:-target}/release/goemo}")"

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    echo "installing slurm-wlm and munge from Debian" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
fi

work="$(mktemp -d)"
stop() {
    local daemons=()
    for f in "$work"/*.pid; do [ -f "$f" ] && daemons+=("$(cat "$f")"); done
    for pid in "${daemons[@]}"; do kill "$pid" 2>/dev/null || true; done
    # Wait for them to go (10 s at most), then make sure.
    for _ in $(seq 50); do
        alive=0
        for pid in "${daemons[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.2
    done
    for pid in "${daemons[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap stop EXIT

# munge: a key of its own and a socket under $work.
mkdir -p "$work/munge"
head -c 1024 /dev/urandom >"$work/munge/munge.key"
chmod 0400 "$work/munge/munge.key"
munged --key-file="$work/munge/munge.key" --socket="$work/munge/socket" \
    --pid-file="$work/munged.pid" --log-file="$work/munged.log" --seed-file="$work/munge/seed" --force
export MUNGE_SOCKET="$work/munge/socket"

host="$(hostname -s)"
cat >"$work/slurm.conf" <<EOF
ClusterName=goemo-test
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$work/munge/socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/slurmctld.log
SlurmdLogFile=$work/slurmd.log
SlurmctldPort=$((20000 + RANDOM % 5000))
SlurmdPort=$((25000 + RANDOM % 5000))
NodeName=$host CPUs=$(nproc) RealMemory=$(free -m | awk '/^Mem:/ {print $2}') State=UNKNOWN
PartitionName=main Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
mkdir -p "$work/state" "$work/spool"
export SLURM_CONF="$work/slurm.conf"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 100); do
    sinfo -h -o %t 2>/dev/null | grep -q idle && break
    sleep 0.2
done
sinfo -h -o %t | grep -q idle || { echo "the node did not come up:" >&2; cat "$work"/slurm*.log >&2; exit 1; }

# The project: prep (changed by the sweep, so every member needs the same new entry) → fit.
project="$work/project"
mkdir -p "$project/sweeps" "$project/deploy/slurm"
cp "$repo/deploy/slurm/sweep.sbatch" "$project/deploy/slurm/"
cat >"$project/pipeline.yaml" <<'EOF'
stages:
  prep:
    kind: command
    params:
      cmd: 'echo prep >> ran.log; sleep 1; echo data > $GOEMO_OUT/data'
  fit:
    kind: command
    deps: {prep: prep}
    params:
      cmd: 'echo fit-$GOEMO_VAR_LR >> ran.log; echo "{\"dev_score\": $GOEMO_VAR_LR}" > $GOEMO_OUT/metrics.json'
      vars: {lr: 0}
EOF
cat >"$project/sweeps/s.yaml" <<'EOF'
sweep:
  name: s
  set:
    prep.vars.v: 1
    fit.vars.lr: [1, 2, 3, 4]
EOF
cd "$project"
# A shared cache too: the tasks claim keys with leases on it and push members' entries and
# records, so a folder that ran nothing lists every member after `exp pull`.
mkdir -p "$work/remote"
export GOEMO_REMOTE="file://$work/remote"
# One CPU and 1 GiB a task here (the file asks 2 and 8G, for training), so tasks run side by side.
GOEMO="$goemo" sbatch --array=0-3 --cpus-per-task=1 --mem=1G --wait --quiet \
    deploy/slurm/sweep.sbatch sweeps/s.yaml
members=$("$goemo" exp show --json --no-baseline | python3 -c 'import json,sys; print(" ".join(sorted(r["name"] for r in json.load(sys.stdin) if r["status"] == "done")))')
preps=$(grep -c '^prep$' ran.log)
fits=$(grep -c '^fit-' ran.log)
echo "members done: $members; prep ran $preps time(s), fit $fits time(s)"
cat slurm-*.log | grep -E "shard|done" || true
[ "$members" = "s-1 s-2 s-3 s-4" ] && [ "$preps" = 1 ] && [ "$fits" = 4 ] || {
    echo "FAILED: expected members s-1..s-4 done, prep once, fit 4 times" >&2
    cat slurm-*.log >&2
    exit 1
}
mkdir -p "$work/viewer"
cp pipeline.yaml "$work/viewer/"
(cd "$work/viewer" && "$goemo" exp pull >/dev/null)
listed=$(cd "$work/viewer" && "$goemo" exp show --json --no-baseline | python3 -c 'import json,sys; print(" ".join(sorted(r["name"] for r in json.load(sys.stdin) if r["status"] == "done" and r["metrics"])))')
leases=$(find "$work/remote/leases" -type f 2>/dev/null | wc -l)
echo "another folder lists: $listed; leases left: $leases"
[ "$listed" = "s-1 s-2 s-3 s-4" ] && [ "$leases" = 0 ] || {
    echo "FAILED: expected s-1..s-4 with metrics listed after exp pull, and no lease left" >&2
    exit 1
}
echo "slurm sweep ok"
