#!/usr/bin/env bash
# Runs the trainer on every host of a Cloud TPU VM slice (one JAX program over all hosts).
# See docs/launch.md. Run with --help for the options; --dry-run prints the gcloud commands.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/launch_tpu_pod.sh --tpu NAME --zone ZONE --config configs/X.py[:variant]
                                 --workdir gs://BUCKET/RUN [options] [--config.a.b=v ...]

Installs the repository on every host of the TPU VM slice NAME and runs
  python -m trainer.main --config=... --workdir=... --config.store.url=... --multihost
on all hosts at once (jax.distributed.initialize() needs no arguments on TPU VMs). Re-running
the same command after a preemption resumes from the newest checkpoint in --workdir.

Required:
  --tpu NAME          TPU VM name (gcloud compute tpus tpu-vm list)
  --zone ZONE         its zone, e.g. us-central2-b
  --config SPEC       experiment config, relative to the repo root, e.g. configs/arith_grpo.py:smoke
  --workdir URL       run directory shared by all hosts (gs://... ; checkpoints, metrics)
Options:
  --project ID        GCP project (default: gcloud's configured project)
  --store URL         kvstore shared with the workers (default: <workdir>/store/)
  --ref REF           git ref to check out on the hosts (clone of --repo); default: copy this
                      checkout's files (tracked and untracked, not ignored) to the hosts
  --repo URL          git URL for --ref (default: this checkout's 'origin' remote)
  --remote-dir DIR    directory on the hosts, relative to $HOME (default: rlax_tpu)
  --jax-extra EXTRA   pip extra for jax on the hosts: tpu (default) or none
  --skip-install      do not copy/clone or run scripts/setup.sh (already installed)
  --dry-run           print the commands instead of running them
  -h, --help          this help
Arguments of the form --config.a.b=v are passed to trainer.main unchanged.
EOF
}

prog=launch_tpu_pod.sh
root="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"
tpu="" zone="" project="" config="" workdir="" store="" ref="" repo=""
remote_dir="rlax_tpu" jax_extra="tpu" skip_install=0 dry_run=0
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --tpu | --zone | --project | --config | --workdir | --store | --ref | --repo | --remote-dir | --jax-extra)
      need_value "$1" $# "${2:-}"
      case "$1" in
        --tpu) tpu="$2" ;;
        --zone) zone="$2" ;;
        --project) project="$2" ;;
        --config) config="$2" ;;
        --workdir) workdir="$2" ;;
        --store) store="$2" ;;
        --ref) ref="$2" ;;
        --repo) repo="$2" ;;
        --remote-dir) remote_dir="$2" ;;
        --jax-extra) jax_extra="$2" ;;
      esac
      shift 2 ;;
    --tpu=* | --zone=* | --project=* | --config=* | --workdir=* | --store=* | --ref=* | --repo=* \
      | --remote-dir=* | --jax-extra=*)
      flag="${1%%=*}"
      set -- "$flag" "${1#*=}" "${@:2}"
      continue ;;
    --skip-install) skip_install=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --config.* | --noconfig.*) overrides+=("$1"); shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[ -n "$tpu" ] || die "missing required flag --tpu"
[ -n "$zone" ] || die "missing required flag --zone"
[ -n "$config" ] || die "missing required flag --config"
[ -n "$workdir" ] || die "missing required flag --workdir"
[[ "$workdir" == gs://* ]] || die "--workdir must be a gs:// URL shared by all hosts, got '$workdir'"
[ -f "$root/${config%%:*}" ] || die "--config: no such file '${config%%:*}' in $root"
case "$jax_extra" in tpu | none) ;; *) die "--jax-extra must be 'tpu' or 'none', got '$jax_extra'" ;; esac
[ -n "$store" ] || store="${workdir%/}/store/"
if [ -n "$ref" ] && [ -z "$repo" ]; then
  repo="$(git -C "$root" remote get-url origin 2>/dev/null)" \
    || die "--ref needs --repo (this checkout has no 'origin' remote)"
fi

gcloud_args=(--zone "$zone")
[ -n "$project" ] && gcloud_args+=(--project "$project")

remote_ssh() {  # remote command on every host
  run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --worker=all --command "$1"
}

if [ "$skip_install" -eq 0 ]; then
  if [ -n "$ref" ]; then
    remote_ssh "set -e; if [ ! -d ~/$(q "$remote_dir")/.git ]; then git clone $(q "$repo") ~/$(q "$remote_dir"); fi; \
cd ~/$(q "$remote_dir") && git fetch --tags origin && git checkout --detach $(q "$ref")"
  else
    # Tracked and untracked (not ignored) files of this checkout, as they are on disk.
    tarball="/tmp/rlax_tpu_src.$$.tgz"
    if [ "$dry_run" -eq 1 ]; then
      echo "+ (cd $(q "$root") && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf $tarball)"
    else
      trap 'rm -f "$tarball"' EXIT
      (cd "$root" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf "$tarball")
    fi
    run gcloud compute tpus tpu-vm scp "$tarball" "$tpu:~/rlax_tpu_src.tgz" "${gcloud_args[@]}" --worker=all
    remote_ssh "set -e; mkdir -p ~/$(q "$remote_dir") && tar xzf ~/rlax_tpu_src.tgz -C ~/$(q "$remote_dir")"
  fi
  install="set -e; cd ~/$(q "$remote_dir") && scripts/setup.sh test"
  if [ "$jax_extra" = tpu ]; then
    install+=" && .venv/bin/python -m pip install -q \"jax[tpu]==\$(.venv/bin/python -c 'import jax; print(jax.__version__)')\""
  fi
  remote_ssh "$install"
fi

train=(.venv/bin/python -m trainer.main "--config=$config" "--workdir=$workdir"
  "--config.store.url=$store" --multihost "${overrides[@]}")
remote_ssh "cd ~/$(q "$remote_dir") && $(q "${train[@]}")"
