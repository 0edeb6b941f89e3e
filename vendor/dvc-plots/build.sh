#!/usr/bin/env bash
# Rebuild index.html, the page `dvc plots show` fills (.dvc/config: plots.html_template): DVC's own page with
# vega, vega-lite and vega-embed inlined instead of loaded from a CDN, so the plots draw with no network and the
# page stays whole when copied. The versions are the ones dvc-render's VegaRenderer names (tests/test_pipeline.py
# checks they still match); the packages come from the npm registry. Run it after upgrading dvc-render.
set -euo pipefail
cd "$(dirname "$0")"
packages=(vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "${packages[@]}" >/dev/null)
scripts=""
for spec in "${packages[@]}"; do
    name=${spec%@*} version=${spec#*@}
    mkdir "$tmp/$name" && tar -xzf "$tmp/$name-$version.tgz" -C "$tmp/$name"
    cp "$tmp/$name/package/LICENSE" "LICENSE.$name"
    scripts+="<script>/* $spec, BSD-3-Clause (LICENSE.$name) */
$(cat "$tmp/$name/package/build/$name.min.js")
</script>
"
done
# dvc-render replaces {refresh_tag} and {plot_divs}; leaving out {scripts} keeps its CDN <script> tags off the page
cat > index.html <<HTML
<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
$scripts    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
HTML
