"""edgeft.export"""
