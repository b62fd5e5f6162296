"""Models' own code ("native"), as a training codebase would write it, for the fixtures.

Each module here is what an engineer would point a native engine at: a factory, a
preprocess and a chat format, named from an experiment as `module:function`.
"""
