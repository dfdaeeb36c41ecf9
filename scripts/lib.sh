#!/usr/bin/env bash
# Helpers shared by the launch scripts (sourced, never run). The caller sets `prog` (its name in
# error messages) and `dry_run` (1: print commands instead of running them).

die() {
  echo "${prog:-rlax_tpu}: $*" >&2
  exit 2
}

need_value() {  # flag, remaining-arg-count, value
  [ "$2" -ge 2 ] && [ -n "$3" ] && [[ "$3" != --* ]] || die "$1 needs a value (see --help)"
}

shq() {  # one shell-quoted word, readable: bare if safe, else in single quotes
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

q() {  # shell-quotes arguments, space-separated, for a remote command line
  local sep=""
  for word in "$@"; do
    printf '%s' "$sep"
    shq "$word"
    sep=" "
  done
}

run() {  # prints the command; runs it unless --dry-run
  echo "+ $(q "$@")"
  [ "${dry_run:-0}" -eq 1 ] || "$@"
}
