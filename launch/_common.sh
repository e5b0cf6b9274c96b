# Helpers shared by the launch scripts (sourced, not run).

# gin_args ARRAY_NAME ARGS...: appends gin bindings to the named array. MACRO=value becomes
# --gin.MACRO=value, with value quoted as a gin string unless it already is a gin literal (number,
# True/False/None, quoted string, tuple/list, @reference, %MACRO); --gin.KEY=VALUE passes through.
gin_args() {
  local -n _out="$1"; shift
  local a key value
  for a in "$@"; do
    if [[ "$a" == --* ]]; then _out+=("$a"); continue; fi
    key="${a%%=*}"; value="${a#*=}"
    if [[ "$value" =~ ^-?[0-9.eE+-]+$ || "$value" =~ ^(True|False|None)$ || "$value" =~ ^[\'\"\(\[@%] ]]; then
      _out+=("--gin.$key=$value")
    else
      _out+=("--gin.$key='$value'")
    fi
  done
}

# run_or_print CMD...: with DRY_RUN=1 prints the command (shell-quoted, one line) instead of running it.
run_or_print() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"; echo
  else
    exec "$@"
  fi
}
