#!/usr/bin/env bash
# Starts (or stops) inference workers on a list of TPU VMs or GPU/CPU machines, all pointed at
# one run's store. See docs/launch.md. Run with --help; --dry-run prints the commands.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/launch_workers.sh --hosts H1,H2,... | --hosts-file FILE
                                 --config configs/X.py[:variant] --workdir DIR --store URL
                                 [options] [--config.a.b=v ...]

On every host, installs the repository (unless --skip-install) and starts --per-host workers
in the background:
  python -m inference_worker.main --config=... --workdir=... --config.store.url=URL \
      --worker_id=<host>-<i>
with output in ~/<remote-dir>/logs/worker-<host>-<i>.log and the pid next to it (.pid).
Workers are stateless: start more at any time, or stop them (--stop sends SIGTERM, and a
worker gives its leases back at once).

Required:
  --hosts LIST        comma-separated hosts: TPU VM names (--via gcloud) or [user@]host (--via ssh)
  --hosts-file FILE   alternatively, one host per line ('#' starts a comment)
  --config SPEC       experiment config, relative to the repo root
  --workdir DIR       the workers' --workdir on each host (local path or gs://)
  --store URL         the run's kvstore, shared with the trainer (e.g. gs://bucket/run/store/)
Options:
  --via gcloud|ssh    gcloud: 'gcloud compute tpus tpu-vm ssh/scp' (single-host TPU VMs, needs
                      --zone); ssh: plain ssh/scp (default: ssh)
  --zone ZONE         TPU zone (--via gcloud)
  --project ID        GCP project (--via gcloud; default: gcloud's configured project)
  --per-host N        workers per host (default 1); with --accel gpu worker i gets GPU i
  --accel tpu|gpu|cpu accelerator of the hosts: installs jax[tpu] / jax[cuda12] / nothing
                      (default: tpu with --via gcloud, gpu with --via ssh)
  --ref REF           git ref to check out on the hosts (clone of --repo); default: copy this
                      checkout's files to the hosts
  --repo URL          git URL for --ref (default: this checkout's 'origin' remote)
  --remote-dir DIR    directory on the hosts, relative to $HOME (default: rlax_tpu)
  --skip-install      do not copy/clone or run scripts/setup.sh
  --stop              stop the workers <host>-0..N-1 started by this script (SIGTERM by pid file)
  --dry-run           print the commands instead of running them
  -h, --help          this help
Arguments of the form --config.a.b=v are passed to inference_worker.main unchanged.
EOF
}

prog=launch_workers.sh
root="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"
hosts_csv="" hosts_file="" config="" workdir="" store="" via="ssh" zone="" project=""
per_host=1 accel="" ref="" repo="" remote_dir="rlax_tpu" skip_install=0 stop=0 dry_run=0
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --hosts | --hosts-file | --config | --workdir | --store | --via | --zone | --project | --per-host \
      | --accel | --ref | --repo | --remote-dir)
      need_value "$1" $# "${2:-}"
      case "$1" in
        --hosts) hosts_csv="$2" ;;
        --hosts-file) hosts_file="$2" ;;
        --config) config="$2" ;;
        --workdir) workdir="$2" ;;
        --store) store="$2" ;;
        --via) via="$2" ;;
        --zone) zone="$2" ;;
        --project) project="$2" ;;
        --per-host) per_host="$2" ;;
        --accel) accel="$2" ;;
        --ref) ref="$2" ;;
        --repo) repo="$2" ;;
        --remote-dir) remote_dir="$2" ;;
      esac
      shift 2 ;;
    --hosts=* | --hosts-file=* | --config=* | --workdir=* | --store=* | --via=* | --zone=* \
      | --project=* | --per-host=* | --accel=* | --ref=* | --repo=* | --remote-dir=*)
      flag="${1%%=*}"
      set -- "$flag" "${1#*=}" "${@:2}"
      continue ;;
    --skip-install) skip_install=1; shift ;;
    --stop) stop=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --config.* | --noconfig.*) overrides+=("$1"); shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

hosts=()
if [ -n "$hosts_csv" ]; then
  IFS=',' read -r -a hosts <<<"$hosts_csv"
fi
if [ -n "$hosts_file" ]; then
  [ -f "$hosts_file" ] || die "--hosts-file: no such file '$hosts_file'"
  while IFS= read -r line || [ -n "$line" ]; do
    line="${line%%#*}"
    line="$(echo "$line" | tr -d '[:space:]')"
    [ -z "$line" ] || hosts+=("$line")
  done <"$hosts_file"
fi
[ "${#hosts[@]}" -gt 0 ] || die "missing required flag --hosts (or --hosts-file)"
[ -n "$config" ] || die "missing required flag --config"
[ -n "$workdir" ] || die "missing required flag --workdir"
[ -n "$store" ] || die "missing required flag --store"
[ -f "$root/${config%%:*}" ] || die "--config: no such file '${config%%:*}' in $root"
[[ "$per_host" =~ ^[1-9][0-9]*$ ]] || die "--per-host must be a positive integer, got '$per_host'"
case "$via" in
  gcloud) [ -n "$zone" ] || die "--via gcloud needs --zone" ;;
  ssh) ;;
  *) die "--via must be 'gcloud' or 'ssh', got '$via'" ;;
esac
[ -n "$accel" ] || { [ "$via" = gcloud ] && accel=tpu || accel=gpu; }
case "$accel" in tpu | gpu | cpu) ;; *) die "--accel must be tpu, gpu or cpu, got '$accel'" ;; esac
if [ "$accel" = tpu ] && [ "$per_host" -gt 1 ]; then
  die "--per-host must be 1 with --accel tpu (one process owns a host's TPU chips)"
fi
if [ -n "$ref" ] && [ -z "$repo" ]; then
  repo="$(git -C "$root" remote get-url origin 2>/dev/null)" \
    || die "--ref needs --repo (this checkout has no 'origin' remote)"
fi

gcloud_args=(--zone "$zone")
[ -n "$project" ] && gcloud_args+=(--project "$project")

remote_ssh() {  # host, command
  if [ "$via" = gcloud ]; then
    run gcloud compute tpus tpu-vm ssh "$1" "${gcloud_args[@]}" --worker=0 --command "$2"
  else
    run ssh -o BatchMode=yes "$1" "$2"
  fi
}

remote_copy() {  # local file, host, remote path (relative to $HOME)
  if [ "$via" = gcloud ]; then
    run gcloud compute tpus tpu-vm scp "$1" "$2:~/$3" "${gcloud_args[@]}" --worker=0
  else
    run scp -o BatchMode=yes "$1" "$2:$3"
  fi
}

worker_id() {  # host, index -> <host>-<i> with only [A-Za-z0-9_.-]
  local h="${1##*@}"
  printf '%s-%s' "${h//[^A-Za-z0-9_.-]/-}" "$2"
}

# shellcheck disable=SC2088  # the ~ expands on the remote host
dir="~/$(q "$remote_dir")"
tarball=""
if [ "$stop" -eq 0 ] && [ "$skip_install" -eq 0 ] && [ -z "$ref" ]; then
  tarball="/tmp/rlax_tpu_src.$$.tgz"
  if [ "$dry_run" -eq 1 ]; then
    echo "+ (cd $(q "$root") && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf $tarball)"
  else
    trap 'rm -f "$tarball"' EXIT
    (cd "$root" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf "$tarball")
  fi
fi

install="set -e; cd $dir && scripts/setup.sh test"
# shellcheck disable=SC2016  # evaluated on the remote host
jax_version='$(.venv/bin/python -c '"'"'import jax; print(jax.__version__)'"'"')'
case "$accel" in
  tpu) install+=" && .venv/bin/python -m pip install -q \"jax[tpu]==$jax_version\"" ;;
  gpu) install+=" && .venv/bin/python -m pip install -q \"jax[cuda12]==$jax_version\"" ;;
esac

for host in "${hosts[@]}"; do
  echo "== $host"
  if [ "$stop" -eq 1 ]; then
    cmd="cd $dir 2>/dev/null || exit 0"
    for ((i = 0; i < per_host; i++)); do
      id="$(worker_id "$host" "$i")"
      cmd+="; if [ -f logs/worker-$id.pid ]; then kill -TERM \$(cat logs/worker-$id.pid) 2>/dev/null \
&& echo 'stopped worker $id' || echo 'worker $id was not running'; rm -f logs/worker-$id.pid; fi"
    done
    remote_ssh "$host" "$cmd"
    continue
  fi
  if [ "$skip_install" -eq 0 ]; then
    if [ -n "$ref" ]; then
      remote_ssh "$host" "set -e; if [ ! -d $dir/.git ]; then git clone $(q "$repo") $dir; fi; \
cd $dir && git fetch --tags origin && git checkout --detach $(q "$ref")"
    else
      remote_copy "$tarball" "$host" rlax_tpu_src.tgz
      remote_ssh "$host" "set -e; mkdir -p $dir && tar xzf ~/rlax_tpu_src.tgz -C $dir"
    fi
    remote_ssh "$host" "$install"
  fi
  cmd="set -e; cd $dir && mkdir -p logs"
  for ((i = 0; i < per_host; i++)); do
    id="$(worker_id "$host" "$i")"
    worker=(.venv/bin/python -m inference_worker.main "--config=$config" "--workdir=$workdir"
      "--config.store.url=$store" "--worker_id=$id" "${overrides[@]}")
    env_prefix=""
    [ "$accel" = gpu ] && env_prefix="CUDA_VISIBLE_DEVICES=$i "
    cmd+="; ${env_prefix}nohup $(q "${worker[@]}") >>logs/worker-$id.log 2>&1 </dev/null & \
echo \$! >logs/worker-$id.pid; echo 'started worker $id (pid '\$!')'"
  done
  remote_ssh "$host" "$cmd"
done
