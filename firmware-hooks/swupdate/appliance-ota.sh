#!/bin/sh
# SWUpdate shell script (sw-description: scripts: ({ filename = "appliance-ota.sh";
# type = "shellscript"; })). SWUpdate calls it with preinst before the images are written,
# postinst after, and postfailure when the update failed; a non-zero exit fails the update.
# Add data = "inplace"; when the update rewrites the running system (no reboot follows): then
# the service is drained before and verified and committed after. Otherwise the reboot into the
# new copy stops the service gracefully, and the boot health check verifies it.
appliance="${APPLIANCE_BIN:-appliance}"
stage="$1"
mode="${2:-reboot}"

case "$stage" in
    preinst)
        "$appliance" ota gate
        case $? in
            0) ;;
            75) echo "appliance: line traffic is busy; install this update later" >&2; exit 1 ;;
            *) echo "appliance: ota gate failed" >&2; exit 1 ;;
        esac
        "$appliance" ota snapshot || exit 1
        if [ "$mode" = inplace ]; then
            "$appliance" ota drain || exit 1
        fi
        ;;
    postinst)
        if [ "$mode" = inplace ]; then
            "$appliance" ota verify || exit 1
            "$appliance" ota commit || exit 1
        fi
        ;;
    postfailure)
        "$appliance" ota rollback || exit 1
        ;;
    *)
        echo "appliance-ota.sh: unknown stage '$stage'; expected preinst, postinst or postfailure" >&2
        exit 1
        ;;
esac
