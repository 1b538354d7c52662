"""The thin SGLang integration of Harli: scheduler subclass, control messages, routes, platforms."""

# SGLang resolves its platform while it is first imported, and that resolution may import our own
# platform module. Importing SGLang here, before any module of this package, makes that cycle always start
# from SGLang's side, where it completes, instead of from a half-initialised module of ours.
import sglang.srt.platforms  # noqa: F401, E402
