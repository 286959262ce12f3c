"""Small helpers shared by tests."""
import robustbench_med as rbm


def tiny_cnn_victim():
    return rbm.create_victim("cnn.phantom", weights=None)
