"""The platform side: gateway, watch, submit, ledger, canaries; a separate service in the same package."""
