#!/usr/bin/env bash
# Type-checks the SDK with TypeScript: the JSDoc of index.js (strict), the
# hand-written index.d.ts against it, and the JS that uses the SDK (tests,
# the conformance driver, examples/node-echo). Not part of CI: it fetches
# TypeScript from the npm registry into a temporary directory.
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp" typecheck/gen' EXIT
npm install --prefix "$tmp" --no-audit --no-fund --silent typescript@5 @types/node@20 >/dev/null
tsc="$tmp/node_modules/.bin/tsc"
common=(--strict --target es2022 --module nodenext --moduleResolution nodenext --typeRoots "$tmp/node_modules/@types" --types node)
"$tsc" "${common[@]}" --allowJs --checkJs --declaration --emitDeclarationOnly --outDir typecheck/gen index.js
"$tsc" "${common[@]}" --noEmit typecheck/surface.mts
"$tsc" "${common[@]}" --allowJs --checkJs --noEmit test/*.mjs testing/*.mjs ../../examples/node-echo/server.js
echo "typecheck: ok"
