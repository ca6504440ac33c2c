"""`appliance ota`: the update hooks gate, drain, snapshot, verify, commit and rollback."""
