"""The opaque-TCP engine: `pipe` joins two connections and copies bytes both ways."""
