"""JSON Schemas of what the admin socket answers (status), validated by the tests."""
