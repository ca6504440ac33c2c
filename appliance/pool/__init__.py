"""The pool link over MQTT (node side) and the platform-side tools `pool watch` and `pool submit`."""
