# Sourced by ci.sh and tls-check.sh: runs README.md's "Adding the dependency"
# section as written. Not a script of its own.

# readme_block NAME: the fenced block between the NAME markers of README.md
# (see .ci/readme-block.sh).
. "$(dirname "${BASH_SOURCE[0]}")/../../.ci/readme-block.sh"

# mvn_quiet filters Maven's "Downloading from central: ..." lines out of what
# it prints (the commands still run as written).
mvn_quiet() { grep -v -E '^\[INFO\] Download(ing|ed) from ' || true; }

# readme_install DIR links "herald" in DIR to this checkout and runs the
# java-install commands in DIR.
readme_install() {
  local dir=$1 install
  install="$(readme_block java-install)" || return 1
  grep -q 'mvn .*install' <<<"$install" || { echo "README.md: the java-install block has no 'mvn ... install'" >&2; return 1; }
  ln -sfn "$(cd ../.. && pwd)" "$dir/herald"
  (
    cd "$dir"
    echo "$install" | sed 's/^/  $ /'
    set -o pipefail
    bash -euo pipefail -c "$install" 2>&1 | mvn_quiet
  ) || { echo "README.md: the java-install commands failed" >&2; return 1; }
}

# readme_consumer DIR writes the consumer-pom block to DIR/your-service/pom.xml
# and the java-main block where its package and class name say, and runs the
# java-run commands in DIR.
readme_consumer() {
  local dir=$1 pom main run pkg cls
  pom="$(readme_block consumer-pom)" || return 1
  main="$(readme_block java-main)" || return 1
  run="$(readme_block java-run)" || return 1
  grep -q '<artifactId>herald-client</artifactId>' <<<"$pom" \
    || { echo "README.md: the consumer-pom block does not depend on herald-client" >&2; return 1; }
  pkg="$(sed -n 's/^package \([a-zA-Z0-9_.]*\);$/\1/p' <<<"$main")"
  cls="$(sed -n 's/^public \(final \)\{0,1\}class \([A-Za-z0-9_]*\).*/\2/p' <<<"$main" | head -1)"
  [[ -n $pkg && -n $cls ]] || { echo "README.md: the java-main block has no package or public class" >&2; return 1; }
  grep -q 'mvn ' <<<"$run" || { echo "README.md: the java-run block runs no mvn" >&2; return 1; }
  mkdir -p "$dir/your-service/src/main/java/${pkg//.//}"
  printf '%s\n' "$pom" >"$dir/your-service/pom.xml"
  printf '%s\n' "$main" >"$dir/your-service/src/main/java/${pkg//.//}/$cls.java"
  echo "  (your-service/pom.xml: the consumer-pom block; src/main/java/${pkg//.//}/$cls.java: the java-main block)"
  (
    cd "$dir"
    echo "$run" | sed 's/^/  $ /'
    set -o pipefail
    bash -euo pipefail -c "$run" 2>&1 | mvn_quiet
  ) || { echo "README.md: the java-run commands failed" >&2; return 1; }
}
