#!/usr/bin/env bash
# Refresh the dashboard's vendored browser libraries from the npm registry.
# Usage: scripts/vendor-dashboard.sh [CYTOSCAPE_VERSION] [UPLOT_VERSION]
# No npm or CDN is used at run time: the built files are committed with their licences.
set -euo pipefail
cy=${1:-3.35.0}
up=${2:-1.6.32}
dest="$(cd "$(dirname "$0")/.." && pwd)/src/diktyo/dashboard/static/vendor"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent "cytoscape@$cy" "uplot@$up" >/dev/null
mkdir cy up
tar xzf "cytoscape-$cy.tgz" -C cy --strip-components=1
tar xzf "uplot-$up.tgz" -C up --strip-components=1
cp cy/dist/cytoscape.min.js "$dest/"
cp cy/LICENSE "$dest/LICENSE.cytoscape"
cp up/dist/uPlot.iife.min.js up/dist/uPlot.min.css "$dest/"
cp up/LICENSE "$dest/LICENSE.uplot"
printf 'cytoscape %s\nuplot %s\n' "$cy" "$up" > "$dest/VERSIONS"
echo "vendored cytoscape $cy and uPlot $up into $dest"
