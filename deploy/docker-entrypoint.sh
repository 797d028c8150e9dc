#!/bin/sh
# Give every replica its own service.instance.id (the dashboards' per-instance
# panels group by it), unless OTEL_RESOURCE_ATTRIBUTES already sets one. Docker
# and Kubernetes both set HOSTNAME to the container or pod name.
set -eu

case ",${OTEL_RESOURCE_ATTRIBUTES:-}," in
    *,service.instance.id=*) ;;
    *)
        OTEL_RESOURCE_ATTRIBUTES="service.instance.id=${HOSTNAME:-unknown}${OTEL_RESOURCE_ATTRIBUTES:+,$OTEL_RESOURCE_ATTRIBUTES}"
        export OTEL_RESOURCE_ATTRIBUTES
        ;;
esac

exec "$@"
