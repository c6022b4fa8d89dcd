# Sourced by the client CI scripts (clients/go/readme.sh,
# clients/java/readme.sh): pulls a fenced block out of a README by its
# markers, so each runs its README's lines as written. Not a script of its own.

# readme_block NAME prints the fenced block between the lines
# "<!-- NAME:begin -->" and "<!-- NAME:end -->" of README.md, without its
# fence lines. It fails when the markers are missing or repeated, when they
# do not hold exactly one fenced block, or when the block is empty.
readme_block() {
  local name=$1 file="${README_MD:-README.md}"
  if [[ $(grep -c -x -- "<!-- $name:begin -->" "$file") -ne 1 || $(grep -c -x -- "<!-- $name:end -->" "$file") -ne 1 ]]; then
    echo "$file: needs exactly one '<!-- $name:begin -->' and one '<!-- $name:end -->' line" >&2
    return 1
  fi
  awk -v b="<!-- $name:begin -->" -v e="<!-- $name:end -->" -v f="$file" '
    $0 == b { inside = 1; next }
    $0 == e { inside = 0; next }
    !inside { next }
    /^```/ { fences++; next }
    fences == 1 { print; lines += ($0 ~ /[^[:space:]]/) }
    END {
      if (fences != 2) { print f ": the " b " block must be one fenced code block" > "/dev/stderr"; exit 1 }
      if (lines == 0) { print f ": the " b " block is empty" > "/dev/stderr"; exit 1 }
    }' "$file"
}
