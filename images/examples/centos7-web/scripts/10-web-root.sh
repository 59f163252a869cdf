#!/bin/bash
# amibake example: runs inside the image being built (a chroot), network on, no daemon started.
set -euo pipefail
install -d -m 0755 /srv/www
printf '<h1>%s, build %s</h1>\n' "$AMIBAKE_IMAGE" "$AMIBAKE_BUILD_ID" >/srv/www/index.html
