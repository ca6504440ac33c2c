#!/bin/sh
# greenboot green script (/etc/greenboot/green.d/): the boot is healthy, so the update stays;
# drop the snapshot taken before it. Idempotent, so a plain reboot is fine too.
"${APPLIANCE_BIN:-appliance}" ota commit || exit 1
