"""The reproduction kit: config-driven experiment runners, the `keras-sp`
command line, and what serves only them: data loaders (`data`), the
experiments' measurements (`measures`), the papers' figures (`plots`) and
the ImageNet MobileNet V1 weights (`weights`, `convert_mobilenet`).

It needs the `experiments` extra (TensorFlow, tensorflow-datasets,
matplotlib, h5py). The library, `keras_sp`, never imports it.
"""
