"""edgeft.runtime"""
