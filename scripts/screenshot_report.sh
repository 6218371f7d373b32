#!/usr/bin/env bash
# Render outputs/report.html in headless Chromium, save a screenshot, and check that every
# image (inline SVG charts and any <img>) loaded with a non-zero size.
#
#   scripts/screenshot_report.sh [outputs/report.html] [report.png]
#
# Installs Debian's chromium when it is missing (needs root and apt).
set -euo pipefail
report="${1:-outputs/report.html}"
shot="${2:-outputs/report_screenshot.png}"
[ -f "$report" ] || { echo "error: $report not found; run \`goemo run\` first" >&2; exit 2; }
if ! command -v chromium >/dev/null; then
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
       --disable-background-networking --disable-component-update --disable-sync
       --hide-scrollbars --virtual-time-budget=5000)
profile=$(mktemp -d)
probe="$profile/probe.html"
trap 'rm -rf "$profile"' EXIT
# The report plus a probe that writes what loaded into the title once the page has loaded.
cat "$report" > "$probe"
cat >> "$probe" <<'JS'
<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const svgs = [...document.querySelectorAll('svg')].filter(s => !s.parentElement.closest('svg'));
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length
           + svgs.filter(s => { const r = s.getBoundingClientRect(); return r.width > 50 && r.height > 50 && s.querySelectorAll('text').length > 0; }).length;
  document.title = `images-loaded ${ok}/${imgs.length + svgs.length}`;
});
</script>
JS
chromium "${flags[@]}" --user-data-dir="$profile/u" --window-size=1280,4000 --screenshot="$shot" "file://$(realpath "$report")" 2>/dev/null
dom=$(chromium "${flags[@]}" --user-data-dir="$profile/u2" --dump-dom "file://$probe" 2>/dev/null)
status=$(grep -o 'images-loaded [0-9]*/[0-9]*' <<<"$dom" || true)
echo "screenshot: $shot"
echo "${status:-images-loaded ?/?}"
loaded=${status#images-loaded }
[ -n "$status" ] && [ "${loaded%/*}" = "${loaded#*/}" ] && [ "${loaded#*/}" -gt 0 ] || { echo "error: not every image loaded" >&2; exit 1; }
