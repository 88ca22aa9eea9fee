#!/usr/bin/env bash
# Rebuild src/magic3d/viewer/vendor/three-bundle.min.js from a pinned three.js release on npm.
# Developer command (needs node + npm); the bundle is committed, so users and CI never run it.
# Change the versions here and in vendor/README.md together.
set -euo pipefail
THREE_VERSION=0.187.0
ESBUILD_VERSION=0.28.2
cd "$(dirname "$0")/.."
VENDOR="$PWD/src/magic3d/viewer/vendor"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
npm init -y >/dev/null
npm install --no-audit --no-fund --save-exact "three@$THREE_VERSION" "esbuild@$ESBUILD_VERSION" >/dev/null 2>&1 \
  || { echo "npm install of three@$THREE_VERSION / esbuild@$ESBUILD_VERSION failed" >&2; exit 1; }
# iife + global name: one classic <script> (file:// pages cannot load ES modules);
# --legal-comments=eof keeps three's license headers in the bundle.
cp "$VENDOR/three-entry.js" entry.js  # bare imports resolve from the entry's folder
node_modules/.bin/esbuild entry.js --bundle --format=iife --global-name=Magic3DThree \
  --minify --legal-comments=eof --log-level=warning --outfile="$VENDOR/three-bundle.min.js"
cp node_modules/three/LICENSE "$VENDOR/LICENSE-three.txt"
echo "three $THREE_VERSION bundled with esbuild $ESBUILD_VERSION into $VENDOR/three-bundle.min.js"
