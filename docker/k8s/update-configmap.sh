#!/usr/bin/env bash
# Copies docker/nginx/lossd.conf.template into nginx-configmap.yaml (after editing the
# template; tests/deploy/test_manifests.py fails while the two differ).
set -euo pipefail
cd "$(dirname "$0")"
{
    sed -n '1,/^  lossd.conf.template: |$/p' nginx-configmap.yaml
    sed 's/^\(.\)/    \1/' ../nginx/lossd.conf.template   # indent all but empty lines
} >nginx-configmap.yaml.new
mv nginx-configmap.yaml.new nginx-configmap.yaml
