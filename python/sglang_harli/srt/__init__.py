"""The thin SGLang integration of Harli: scheduler subclass, control messages, routes, platforms."""
