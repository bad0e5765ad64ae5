# shellcheck shell=bash
# Helpers shared by the launch scripts; sourced, never run on its own.
#
# Every command a script would run goes through `run` (or `run_exec`): in --dry-run mode it is printed, one
# command per line on stdout, quoted so that `sh` (or Python's shlex.split) reads back exactly the same
# arguments, and nothing is run. Otherwise it is echoed to stderr with a "+ " prefix and run.

DRY_RUN=0

die() {
  echo "$(basename "$0"): $*" >&2
  echo "Run $(basename "$0") --help for usage." >&2
  exit 2
}

# quote ARG...: the arguments as one line of shell words; single quotes only where a word needs them.
quote() {
  local word out=()
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

run() {
  if ((DRY_RUN)); then
    quote "$@"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

# run_exec CMD...: like `run`, but replaces this shell (the command keeps the script's process id).
run_exec() {
  if ((DRY_RUN)); then
    quote "$@"
    exit 0
  fi
  echo "+ $(quote "$@")" >&2
  exec "$@"
}

# need_value OPTION "$#": an option that takes a value must have one.
need_value() {
  (($2 >= 2)) || die "option $1 needs a value"
}

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

# fail_if_problems: die listing every collected problem (array PROBLEMS), one per line.
fail_if_problems() {
  if ((${#PROBLEMS[@]})); then
    echo "$(basename "$0"): ${#PROBLEMS[@]} problem(s) with the arguments:" >&2
    printf '  %s\n' "${PROBLEMS[@]}" >&2
    echo "Run $(basename "$0") --help for usage." >&2
    exit 2
  fi
}
