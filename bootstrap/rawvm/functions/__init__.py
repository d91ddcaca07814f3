"""``@rawvm.function``: ``remote`` (the decorator and RemoteFunction) over ``pool`` (machines that keep call
workers, reused while the function's code and environment are the same)."""
