"""System integration: systemd notify and socket activation, the admin socket, provisioning."""
