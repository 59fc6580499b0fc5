"""Placement planning (issue 5): which tensor goes to which device, in which format; pure functions over
ModelConfig that return a Plan. Nothing here yet but the package, so the layer rule is checked from day one."""
