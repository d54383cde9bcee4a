"""Presets: each module defines CONFIG, setting only what differs from the defaults."""
