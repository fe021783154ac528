"""HISF multi-modal prompt learning on a frozen open_clip backbone: the method library."""
