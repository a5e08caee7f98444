"""The model's files and memory: presets, names, files, loading, the memory planner and the manager that places
each component; the tiny random-weight kits. This wing knows nothing of LoRAs, runs or pages."""
