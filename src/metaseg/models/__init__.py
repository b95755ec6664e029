"""Models: DeepLabv3 construction, head design, the deployable adapted-model format."""
