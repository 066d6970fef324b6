// palmcore_emu_fiber_switch(void** save, void* load) (fiber_switch.h), x86-64 System V:
// pushes the callee-saved registers and the MXCSR / x87 control words, stores the stack pointer
// in *save (rdi), loads `load` (rsi) and pops the same from there.
    .text
    .globl palmcore_emu_fiber_switch
    .hidden palmcore_emu_fiber_switch
    .type palmcore_emu_fiber_switch, @function
palmcore_emu_fiber_switch:
    .cfi_startproc
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .cfi_endproc
    .size palmcore_emu_fiber_switch, .-palmcore_emu_fiber_switch
    .section .note.GNU-stack, "", @progbits
