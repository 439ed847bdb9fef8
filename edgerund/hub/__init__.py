"""edgerund.hub"""
