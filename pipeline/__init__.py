"""edgeft.pipeline"""
