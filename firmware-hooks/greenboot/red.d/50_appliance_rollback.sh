#!/bin/sh
# greenboot red script (/etc/greenboot/red.d/): the boot failed its health checks; restore the
# snapshot so whichever deployment boots next finds the state it had before the update.
"${APPLIANCE_BIN:-appliance}" ota rollback || exit 1
