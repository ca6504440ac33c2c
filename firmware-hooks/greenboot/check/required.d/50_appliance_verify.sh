#!/bin/sh
# greenboot required health check (/etc/greenboot/check/required.d/): a failure marks the boot
# red, and after the boot counter runs out greenboot falls back to the previous deployment.
# `appliance ota verify` waits for the service to be ready before judging it.
"${APPLIANCE_BIN:-appliance}" ota verify || exit 1
