# Sourced by ci.sh and tls-check.sh: runs README.md's Install section as
# written. Not a script of its own.

# readme_block NAME: the fenced block between the NAME markers of README.md
# (see .ci/readme-block.sh).
. "$(dirname "${BASH_SOURCE[0]}")/../../.ci/readme-block.sh"

# run_readme DIR [build-only] follows README.md's Install section in DIR, a
# directory of its own: "herald" there is a link to this checkout, the
# go-install commands run in DIR, main.go (the go-main block) goes where they
# leave off (your-service), and the go-run commands run there. With
# build-only (no node to send to) the "go run" lines are left out and the
# program is only built. Everything it prints goes to stdout.
run_readme() {
  local dir=$1 mode=${2:-}
  local install main run
  install="$(readme_block go-install)" || return 1
  main="$(readme_block go-main)" || return 1
  run="$(readme_block go-run)" || return 1
  grep -q -- '-replace=github.com/herald-push/herald/clients/go=' <<<"$install" \
    || { echo "README.md: the go-install block has no -replace of github.com/herald-push/herald/clients/go" >&2; return 1; }
  grep -q '^go run ' <<<"$run" || { echo "README.md: the go-run block has no 'go run' line" >&2; return 1; }
  ln -s "$(cd ../.. && pwd)" "$dir/herald"
  (
    cd "$dir"
    echo "$install" | sed 's/^/  $ /'
    bash -euo pipefail -c "$install"$'\n'"pwd >'$dir/.module-dir'"
  ) || { echo "README.md: the go-install commands failed" >&2; return 1; }
  local module
  module="$(cat "$dir/.module-dir")"
  printf '%s\n' "$main" >"$module/main.go"
  echo "  (main.go: the go-main block, $(wc -l <"$module/main.go") lines, in ${module#"$dir"/})"
  if [[ $mode == build-only ]]; then
    run="$(sed '/^go run /d' <<<"$run")"$'\n'"go build -o /dev/null ."
  fi
  (
    cd "$module"
    echo "$run" | sed 's/^/  $ /'
    bash -euo pipefail -c "$run"
  ) || { echo "README.md: the go-run commands failed" >&2; return 1; }
}
